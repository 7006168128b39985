# The atlasd image the chart runs (charts/atlasd: image ghcr.io/atlasd/atlasd, command
# `atlasd`). Not built in this project's CI: its machines have no container engine.
FROM python:3.11-slim
RUN useradd --uid 65532 --no-create-home --shell /usr/sbin/nologin atlasd
WORKDIR /src
COPY pyproject.toml README.md ./
COPY atlasd ./atlasd
RUN pip install --no-cache-dir . && rm -rf /src
USER 65532:65532
ENTRYPOINT ["atlasd"]
CMD ["run"]
