"""New review samples in, FiftyOne sample documents written in one round trip per batch out.

The one place that writes through FiftyOne's private internals, kept because the public
`Dataset.add_samples` is >10x slower here (Sample objects, schema checks, re-reading every
inserted document; `benchmarks/bench_review.py`). Updates use the public `set_values`, which
is as fast. `tests/curation/test_review.py::test_bulk_documents_match_add_samples` compares
these documents with what `add_samples` writes for the same sample, so a FiftyOne upgrade that
changes the layout fails a test instead of corrupting a dataset.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import fiftyone as fo


def declare_fields(ds: "fo.Dataset", fields: dict[str, Any]) -> None:
    """Add sample fields (name -> fo.Field instance) in one schema merge.

    `add_sample_field` reloads the dataset after each field (~0.15 s each, ~30 fields).
    """
    if not fields:
        return
    try:
        ds._sample_doc_cls.merge_field_schema(fields)
        ds._reload()
    except Exception:  # pragma: no cover - a FiftyOne without the bulk path: the public one
        for name, f in fields.items():
            if name not in ds.get_field_schema():
                ds.add_sample_field(name, type(f))


def sample_doc(ds: "fo.Dataset", *, filepath: str, tags: list[str], ground_truth: str | None,
               fields: dict[str, Any]) -> dict:
    """A sample document as FiftyOne 1.x stores it; None values are left out (as missing fields)."""
    from bson import ObjectId
    from fiftyone.core.odm.sample import _generate_rand

    now = datetime.now(timezone.utc).replace(tzinfo=None)  # FiftyOne stores naive UTC
    doc: dict[str, Any] = {"filepath": filepath, "tags": list(tags), "_media_type": "image", "_rand": _generate_rand()}
    if ground_truth is not None:
        doc["ground_truth"] = {"_id": ObjectId(), "_cls": "Classification", "tags": [], "label": ground_truth}
    doc.update((k, v) for k, v in fields.items() if v is not None)
    doc.update(_dataset_id=ds._doc.id, created_at=now, last_modified_at=now)
    return doc


def insert(ds: "fo.Dataset", docs: list[dict]) -> None:
    """Insert documents made by `sample_doc`; every field must have been declared first."""
    if ds.media_type is None:
        ds.media_type = "image"
    if docs:
        ds._sample_collection.insert_many(docs, ordered=True)
        ds.reload()
