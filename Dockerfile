# syntax=docker/dockerfile:1
# deltavec: the job, Spark 4, the Delta JARs and the default model in one image
# that runs offline, on a CPU or on NVIDIA GPUs.
#
#   docker build -t deltavec .
#   docker run --rm --init deltavec demo              # sample table, embed, search
#   docker run --init --gpus all -v deltavec:/var/lib/deltavec -p 9464:9464 \
#       -e DELTAVEC_SOURCE__PATH=s3a://... -e DELTAVEC_TARGET__PATH=s3a://... deltavec run
#
# Tables and checkpoints given as relative paths land in /var/lib/deltavec (the
# user's home): keep it on a volume. See docs/cluster.md for clusters.
#
# Stages: `base` (CUDA userland and a Java 17 JRE), `build` (Python 3.11, the
# venv, the JARs, all checked offline), `runtime` (base plus the finished
# /opt/python and /opt/deltavec, run as a non-root user). The install steps live
# in docker/install.sh, which the test suite runs outside Docker.

# torch's wheels bring their own CUDA libraries (the nvidia-* pins in
# constraints.txt), so the CUDA "base" flavour is all the image needs: the
# settings the NVIDIA container toolkit reads, and a clear refusal on a driver
# too old for CUDA 13. The "runtime" flavour would add a second, unused copy of
# cuBLAS and friends (about 2 GB).
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.8.14
ARG PYTHON_VERSION=3.11.13

FROM ${UV_IMAGE} AS uv

FROM ${CUDA_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive
# Java 17 runs Spark's JVM; procps gives Spark's scripts `ps`.
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless ca-certificates procps \
    && rm -rf /var/lib/apt/lists/*

FROM base AS build
ARG PYTHON_VERSION
# Maven coordinates to bake in beside Delta, e.g. org.apache.hadoop:hadoop-aws:3.4.1 for s3a://.
ARG SPARK_PACKAGES=""
COPY --from=uv /uv /usr/local/bin/uv
# A relocatable CPython (python-build-standalone) at a path the runtime stage keeps.
ENV UV_PYTHON_INSTALL_DIR=/opt/python
RUN uv python install "${PYTHON_VERSION}" \
    && "$(uv python find "${PYTHON_VERSION}")" -m venv /opt/deltavec/venv
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY streaming ./streaming
COPY docker/install.sh ./docker/install.sh
# The package and its pinned dependencies; then the JARs, resolved now into
# Spark's own jars/ folder so nothing is fetched at run time; then an offline check.
RUN docker/install.sh package /opt/deltavec/venv/bin/python /src \
    && docker/install.sh jars /opt/deltavec/venv/bin/python \
        /opt/deltavec/venv/lib/python3.11/site-packages/pyspark/jars "${SPARK_PACKAGES}" \
    && docker/install.sh check /opt/deltavec/venv/bin/python

FROM base AS runtime
LABEL org.opencontainers.image.title="deltavec" \
      org.opencontainers.image.description="Streaming embeddings for Delta Lake" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 deltavec \
    && useradd --system --uid 10001 --gid deltavec --create-home \
        --home-dir /var/lib/deltavec --shell /usr/sbin/nologin deltavec
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/deltavec /opt/deltavec
COPY conf /opt/deltavec/conf
COPY docker/spark-entrypoint.sh /opt/deltavec/bin/spark-entrypoint
COPY docker/driver.py /opt/deltavec/bin/driver.py
# PYSPARK_PYTHON: executors started from this image run the same interpreter.
# DELTAVEC_METRICS__HOST: the metrics endpoint must be reachable from outside the
# container (the config's default is loopback).
ENV PATH=/opt/deltavec/venv/bin:${PATH} \
    VIRTUAL_ENV=/opt/deltavec/venv \
    SPARK_HOME=/opt/deltavec/venv/lib/python3.11/site-packages/pyspark \
    PYSPARK_PYTHON=/opt/deltavec/venv/bin/python \
    DELTAVEC_CONFIG=/opt/deltavec/conf/deltavec.toml \
    DELTAVEC_METRICS__HOST=0.0.0.0 \
    HF_HOME=/var/lib/deltavec/.cache/huggingface \
    PYTHONUNBUFFERED=1
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
# Relative paths in the config (data/, checkpoints/) land here; mount a volume.
WORKDIR /var/lib/deltavec
EXPOSE 9464
# Healthy while the driver serves /metrics; the start period covers Spark's
# start-up and the model load.
HEALTHCHECK --interval=30s --timeout=5s --start-period=3m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ.get('DELTAVEC_METRICS__PORT', '9464'), timeout=4)"]
ENTRYPOINT ["deltavec"]
CMD ["run"]
