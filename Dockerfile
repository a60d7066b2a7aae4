# The Goldsmith image: Airflow's image with the local backend's tools (QEMU, qemu-utils, mmdebstrap, OpenSSH) and
# Goldsmith installed from a wheelhouse made on the host (`make wheelhouse`: no index is needed to build it).
# AIRFLOW_IMAGE is the official apache/airflow image, or a local stand-in of it (deploy/stand-ins/).
ARG AIRFLOW_IMAGE=apache/airflow:3.3.2-python3.11
FROM ${AIRFLOW_IMAGE}

USER root
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        qemu-system-x86 qemu-utils mmdebstrap genisoimage openssh-client e2fsprogs fdisk gdisk util-linux zstd \
    && rm -rf /var/lib/apt/lists/* \
    # Workers run as airflow: QEMU under TCG needs no privilege; with the host's /dev/kvm passed in
    # (docker-compose.kvm.yaml) the group that owns it is added to the container.
    && mkdir -p /opt/goldsmith-home/staging /opt/goldsmith-cache \
    && chown -R airflow:0 /opt/goldsmith-home /opt/goldsmith-cache

# Editable, so the checkout's include/ (platform catalog, scripts) sits where the package expects it.
COPY --chown=airflow:0 . /opt/goldsmith
USER airflow
RUN pip install -q --no-cache-dir --no-index --find-links /opt/goldsmith/build/wheelhouse -e /opt/goldsmith \
    && rm -rf /opt/goldsmith/build
