# The atlasd image the chart runs (charts/atlasd: image ghcr.io/atlasd/atlasd, command
# `atlasd`). Built by `make image` (tests/harness/images.py) and run on a real node in
# `make test`.
FROM python:3.11-slim
RUN useradd --uid 65532 --no-create-home --shell /usr/sbin/nologin atlasd
WORKDIR /src
COPY pyproject.toml README.md ./
COPY atlasd ./atlasd
RUN pip install --no-cache-dir . && rm -rf /src
USER 65532:65532
ENTRYPOINT ["atlasd"]
CMD ["run"]
