# The jurassiclass worker image: this project installed, a Prefect process worker as entrypoint.
# Built by docker-compose.yml (`prefect-worker`); flows run from /opt/jurassiclass, the same layout
# as a clone, so the deployments of prefect.yaml load unchanged.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    DO_NOT_TRACK=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    FIFTYONE_DATABASE_VALIDATION=false \
    FIFTYONE_DO_NOT_TRACK=true \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    NO_ALBUMENTATIONS_UPDATE=1

# libgl/glib: OpenCV (pulled in by FiftyOne) needs them even headless.
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/jurassiclass
# Dependencies first, so code edits do not reinstall torch.
COPY pyproject.toml README.md ./
RUN mkdir -p curation models flows && touch curation/__init__.py models/__init__.py flows/__init__.py \
    && pip install -e . && pip check
COPY . .
RUN pip install --no-deps -e .

RUN useradd --create-home --uid 1000 curator && mkdir -p /opt/jurassiclass/workspaces /opt/jurassiclass/hf-cache \
    && chown curator /opt/jurassiclass /opt/jurassiclass/workspaces /opt/jurassiclass/hf-cache
USER curator

CMD ["prefect", "worker", "start", "--pool", "jurassiclass-process", "--type", "process"]
