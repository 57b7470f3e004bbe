# One image for both roles of a medfed federation (k8s/README.md deploys them):
#   aggregator: medfed server --kit /kit --state /state ...         gateway: 9092 9098 9400
#   hospital:   medfed site --kit /kit --data /data --state /state ...  SuperNode: 9401 9099
#
#   CPU image (aggregator, CPU sites):  docker build -t medfed:0.1.0 .
#   CUDA image (GPU sites):             docker build -t medfed:0.1.0-cuda \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cuXYZ .   (k8s/README.md)
#
# The image holds no kit, key or data: those are mounted at run time (/kit, /data, /state).
FROM python:3.11-slim

# PyTorch's wheel index decides which torch build goes in. The default, the CPU index, gives a
# CPU-only torch (a plain `pip install torch` on Linux pulls the CUDA build and its NVIDIA
# libraries, gigabytes, into every image). GPU sites pass a CUDA index, .../whl/cuXYZ: the CUDA
# versions published for the pinned torch are listed at https://download.pytorch.org/whl/torch/.
# CUDA wheels carry the CUDA runtime libraries themselves, so this slim base also serves GPU
# nodes, which need only the NVIDIA driver and Kubernetes device plugin (no nvidia/cuda base).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# The root filesystem is read-only in Kubernetes: no bytecode files, and a HOME that the
# manifests back with a writable emptyDir. FLWR_HOME is set per role by the manifests (/state/flwr).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/medfed \
    MEDFED_APP_DIR=/opt/medfed/app

# nginx: `medfed server` serves the federation's port through it (server/gateway.py: the
# Control API for operator certificates only); it runs unprivileged from /state, never as a
# service. Debian's plain `nginx` package name (on bookworm it brings nginx-core, a superset of
# nginx-light) is chosen because it exists in every Debian release the slim base may follow;
# the gateway needs only its ssl, map and proxy modules.
RUN apt-get update \
    && apt-get install -y --no-install-recommends nginx \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 10001 medfed \
    && useradd --uid 10001 --gid 10001 --home-dir /home/medfed --create-home \
        --shell /usr/sbin/nologin medfed

# The Flower App source: `medfed run` and Flower build the app bundle from this folder.
WORKDIR /opt/medfed/app

# torch first, in its own layer, at the exact version pyproject.toml pins (the one place it is
# written), from the index chosen above; `pip install .` below then finds it satisfied.
COPY pyproject.toml ./
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "$(python -c 'import re, tomllib; \
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; \
print(next(d for d in deps if re.match(r"torch\s*[=<>!~]", d)))')"

# LICENSE* copies a licence file when the repository has one (Flower's app bundle wants it).
COPY README.md LICENSE* ./
COPY medfed/ medfed/
COPY server/ server/
COPY client/ client/
COPY common/ common/
COPY models/ models/
COPY simulations/ simulations/
RUN pip install --no-cache-dir . && rm -rf build ./*.egg-info

USER 10001:10001
WORKDIR /home/medfed

# aggregator: 9092 the gateway (HTTPS: Fleet, and Control for operator certificates only),
#             9098 gRPC health, 9400 /metrics and dashboard
# hospital:   9401 /metrics, 9099 gRPC health
EXPOSE 9092 9098 9400 9401 9099

ENTRYPOINT ["medfed"]
CMD ["--help"]
