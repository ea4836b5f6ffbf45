# CPU image that serves one lmtune run directory:
#   docker build -t lmtune-serve .
#   docker run -p 8000:8000 -e LMTUNE_API_KEYS=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))') \
#              -v $PWD/runs/my-run:/run:ro lmtune-serve
# The run is mounted read-only at /run; its ONNX export (lmtune export RUN --quantize int8) is used
# when present. Keys come from LMTUNE_API_KEYS (or mount a file and add --api-key-file).
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
# every other package at the version and hash requirements.lock gives (see docs/installs.md)
COPY pyproject.toml README.md requirements.lock ./
RUN pip install --no-deps --require-hashes -r requirements.lock
COPY lmtune ./lmtune
RUN pip install --no-deps --no-build-isolation . && useradd --create-home lmtune
USER lmtune
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
# uvicorn finishes in-flight requests on SIGTERM (graceful shutdown, up to 30 s)
ENTRYPOINT ["lmtune", "serve", "/run", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--workers", "1"]
