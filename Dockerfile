# The controller image: `agentainer controller` as a non-root user, no build tools inside.
#
#   make controller-image                      # here: wheels built on the host, a local base
#   docker build --build-arg BASE_IMAGE=python:3.11-slim-bookworm -t agentainer/controller .
#
# The wheels come from `pip wheel` on the host (dist/wheels), so the build needs no network.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
COPY dist/wheels /wheels
RUN python3 -m venv /opt/agentainer \
 && /opt/agentainer/bin/pip install --no-cache-dir --no-index --find-links /wheels \
        agentainer-operator \
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
