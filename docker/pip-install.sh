#!/bin/sh
# `pip install` for the image builds (docker/Dockerfile). With the build secret `ca_bundle`
# (docker build --secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt), pip verifies TLS against
# that bundle: a TLS-intercepting proxy, a private index. Without it, pip's own certificates. The
# secret is mounted for the one RUN only: it is in no layer of the image.
set -eu
if [ -s /run/secrets/ca_bundle ]; then
  export PIP_CERT=/run/secrets/ca_bundle
fi
exec pip install --progress-bar off "$@"
