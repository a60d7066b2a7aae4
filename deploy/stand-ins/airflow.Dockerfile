# A local stand-in for apache/airflow:3.3.2-python3.11 where no registry is reachable: the same Airflow from
# the project's pinned wheelhouse, the same layout (AIRFLOW_HOME /opt/airflow, user airflow 50000:0, an
# entrypoint that runs `airflow <command>`). Build context: build/ (wheelhouse/ and compose-pins.txt).
ARG BASE_IMAGE=goldsmith-base/debian:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        python3 python3-venv curl dumb-init ca-certificates procps \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 50000 --gid 0 --create-home --home-dir /home/airflow airflow \
    && mkdir -p /opt/airflow /opt/python && chown airflow:0 /opt/airflow /opt/python \
    && printf '%s\n' '#!/bin/bash' \
        '# Like the official entrypoint: bash/python/airflow commands as given, anything else is airflow <args>' \
        '# (the compose file'"'"'s `celery worker` is `airflow celery worker`).' \
        'case "$1" in bash|python|python3|airflow) exec "$@";; esac' \
        'exec airflow "$@"' > /entrypoint && chmod 755 /entrypoint
ENV AIRFLOW_HOME=/opt/airflow PATH=/opt/python/bin:/home/airflow/.local/bin:$PATH PYTHONUNBUFFERED=1
USER airflow
COPY compose-pins.txt /tmp/pins.txt
COPY wheelhouse /tmp/wheelhouse
RUN python3 -m venv /opt/python \
    && pip install -q --no-cache-dir --no-index --find-links /tmp/wheelhouse -c /tmp/pins.txt \
        apache-airflow==3.3.2 apache-airflow-providers-celery apache-airflow-providers-postgres flower psycopg2-binary redis
WORKDIR /opt/airflow
EXPOSE 8080
ENTRYPOINT ["/usr/bin/dumb-init", "--", "/entrypoint"]
CMD []
