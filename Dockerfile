# syntax=docker/dockerfile:1
# One image for every role of bitscout: the API, the dispatcher, the Ray head and the Ray workers
# (Ray needs the same Python, Ray and bitscout versions on every node).
#
#   docker build -t bitscout .                      # CPU build of torch
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t bitscout:cuda .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    BITSCOUT_DATA_DIR=/data

# An unprivileged user; /data holds the file store and the runners' work directory.
RUN useradd --create-home --uid 1000 bitscout \
    && mkdir -p /data /models /inputs /home/bitscout/.cache/huggingface \
    && chown -R bitscout:bitscout /data /home/bitscout/.cache

WORKDIR /opt/bitscout
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# Dependencies first (cached while only the code changes): install the project's declared
# dependencies from a copy of pyproject.toml with empty packages, then the code itself.
COPY pyproject.toml README.md ./
RUN mkdir -p bitscout search service workers migrations \
    && touch bitscout/__init__.py search/__init__.py service/__init__.py workers/__init__.py migrations/__init__.py \
    && pip install --extra-index-url "${TORCH_INDEX_URL}" ".[workers]" \
    && pip uninstall -y bitscout

COPY bitscout ./bitscout
COPY search ./search
COPY service ./service
COPY workers ./workers
COPY migrations ./migrations
RUN pip install --no-deps . && python -c "import bitscout, search.pipeline, service.app, workers.dispatcher"

USER bitscout
WORKDIR /home/bitscout
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"

# The embedded default: API + dispatcher + a local Ray on SQLite in /data.
CMD ["bitscout", "serve", "--host", "0.0.0.0", "--port", "8000"]
