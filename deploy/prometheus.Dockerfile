# A Prometheus image from a Prometheus binary on the host (Debian's
# `prometheus` package), for machines that cannot pull prom/prometheus.
#   docker build -f deploy/prometheus.Dockerfile -t gradcast-prometheus CONTEXT
# where CONTEXT holds the `prometheus` binary.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
COPY prometheus /bin/prometheus
RUN mkdir -p /prometheus && chown nobody /prometheus
USER nobody
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
