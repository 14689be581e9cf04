# The pod end's image: 'svctunnel agent' on Python slim, with the nft tool it programs its
# port filter with. Build it from the repository root and make it available to the cluster:
#   docker build -t svctunnel-agent:0.1.0 .
#   kind load docker-image svctunnel-agent:0.1.0          # KinD
#   docker tag/push to a registry the cluster pulls from  # elsewhere; then --svctunnel-image
# BASE lets a build without a registry (the project's e2e tests) use a base image of its own;
# it must have Python 3.10 or newer with pip, and apt-get.
ARG BASE=python:3.12-slim
FROM ${BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pytest_svctunnel ./pytest_svctunnel
COPY manifests ./manifests
RUN pip install --no-cache-dir . && rm -rf /src
WORKDIR /
# The Deployment runs 'svctunnel agent' itself; the entrypoint makes 'docker run IMAGE' do the same.
ENTRYPOINT ["svctunnel", "agent"]
