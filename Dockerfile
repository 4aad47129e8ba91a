# mixq-onnx deployment image for NVIDIA GPU hosts: build, inspect, run and bench TensorRT engines.
#
#   docker build -t mixq-onnx:trt .
#   docker run --gpus all --rm -v "$PWD:/work" -w /work mixq-onnx:trt build model.onnx --out model.plan
#
# The base image carries CUDA, cuDNN and TensorRT (C++ runtime and the `tensorrt` Python wheel);
# pick the tag whose TensorRT is >= 10.12 and whose CUDA matches your driver (see NVIDIA's
# framework support matrix). Plans are only valid for the TensorRT version and GPU they were
# built with, so build them inside this image, on the GPU that will run them.
ARG BASE=nvcr.io/nvidia/tensorrt:25.08-py3
FROM ${BASE}

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_DISABLE_TELEMETRY=1

WORKDIR /opt/mixq-onnx
COPY pyproject.toml README.md ./
COPY mixq_onnx ./mixq_onnx

# 1) the package with the TensorRT and GPU extras: torch (CUDA wheels), tensorrt>=10.12, cuda-python,
#    onnxruntime-gpu. The core dependency `onnxruntime` (CPU) comes along with it.
# 2) onnxruntime and onnxruntime-gpu share the `onnxruntime` import package, so both installed
#    means whichever was unpacked last wins: remove both and reinstall only the GPU build.
# 3) fail the image build if the CPU wheel crept back or the CUDA provider is missing.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
RUN python -m pip install --upgrade pip \
 && python -m pip install --extra-index-url "${TORCH_INDEX}" ".[trt,gpu]" \
 && ORT_GPU="$(python -m pip show onnxruntime-gpu | sed -n 's/^Version: //p')" \
 && python -m pip uninstall -y onnxruntime onnxruntime-gpu \
 && python -m pip install --no-deps "onnxruntime-gpu==${ORT_GPU}" \
 && ! python -m pip show onnxruntime >/dev/null 2>&1 \
 && python -c "import onnxruntime as o, tensorrt as t; \
assert 'CUDAExecutionProvider' in o.get_available_providers(), o.get_available_providers(); \
print('onnxruntime-gpu', o.__version__, 'tensorrt', t.__version__)"

WORKDIR /work
ENTRYPOINT ["mixq-onnx"]
CMD ["--help"]
