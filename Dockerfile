# The hsl image: one image for every distributed role (api, worker, reaper) and for local runs.
#   docker build -t hsl:latest .
#   docker run --rm hsl:latest run fig2-cpu          # ENTRYPOINT is `hsl`
# docker-compose.yml runs the roles from this image (it clears the entrypoint so its commands
# can chain `hsl db upgrade && hsl api`). HSL_EXTRAS selects pip extras: "[gpu]" adds PyTorch
# at the version pyproject.toml pins, whose Linux x86_64 wheel is the CUDA build (the CUDA
# libraries come with it; the driver comes from the host, through the NVIDIA Container
# Toolkit). The build fails if that PyTorch is not a CUDA build.
#   docker build --build-arg HSL_EXTRAS="[gpu]" -t hsl:gpu .
FROM python:3.11-slim

ARG HSL_EXTRAS=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # matplotlib caches fonts under $MPLCONFIGDIR; keep it writable for the non-root user
    MPLCONFIGDIR=/tmp/matplotlib

# A non-root user with a writable working directory (the embedded default keeps ./.hsl there).
RUN groupadd --system --gid 10001 hsl \
    && useradd --system --uid 10001 --gid hsl --create-home --home-dir /home/hsl hsl

WORKDIR /src
COPY . /src
# A regular (non-editable) install: the image needs the package, not the source tree.
RUN pip install "/src${HSL_EXTRAS}" \
    && case "${HSL_EXTRAS}" in \
         *gpu*) python -c "import sys, torch; sys.exit(0 if torch.version.cuda else 'PyTorch ' + torch.__version__ + ' is not a CUDA build')" ;; \
       esac \
    && rm -rf /src

WORKDIR /home/hsl
USER hsl

EXPOSE 8000
ENTRYPOINT ["hsl"]
CMD ["--help"]
