# The controller image: `agentainer controller` as a non-root user, no build tools inside.
#
#   docker build -t agentainer .       # where images are pulled and PyPI answers
#   make controller-image              # offline: wheels built on the host, a local base image
#
# The build stage installs the package from this source tree into a venv. Offline,
# scripts/build-controller-image.sh passes PIP_ARGS="--no-index --find-links /src/dist/wheels"
# and PACKAGE=agentainer-operator: the same install, from wheels built beforehand. Behind a
# proxy that re-signs TLS, PIP_CA_PEM (the proxy's CA, as PEM text) is what pip trusts; it
# stays in the build stage.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG PIP_ARGS=""
ARG PACKAGE=/src
ARG PIP_CA_PEM=""
COPY . /src
RUN if [ -n "$PIP_CA_PEM" ]; then printf '%s\n' "$PIP_CA_PEM" > /tmp/ca.pem \
      && export PIP_CERT=/tmp/ca.pem; fi \
 && python3 -m venv /opt/agentainer \
 && /opt/agentainer/bin/pip install --no-cache-dir ${PIP_ARGS} "${PACKAGE}" \
 && /opt/agentainer/bin/pip uninstall -y pip

FROM ${BASE_IMAGE}
COPY --from=build /opt/agentainer /opt/agentainer
# A fixed unprivileged user: the Helm chart's securityContext runs as it.
RUN echo 'agentainer:x:10001:10001::/nonexistent:/usr/sbin/nologin' >> /etc/passwd \
 && echo 'agentainer:x:10001:' >> /etc/group
USER 10001:10001
ENV PATH=/opt/agentainer/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
EXPOSE 8080
ENTRYPOINT ["agentainer", "controller"]
