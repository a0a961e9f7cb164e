# First version: one stage, CPU or GPU (torch from PyPI carries CUDA), Java 17 for Spark.
FROM python:3.11-slim-bookworm

RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY streaming ./streaming
COPY conf ./conf
RUN pip install --no-cache-dir -c constraints.txt .

ENTRYPOINT ["deltavec"]
CMD ["run", "--config", "conf/deltavec.toml"]
