"""The file names inside an artifact or engine directory: the one place both the manifest and the
artifact writer take them from."""

MANIFEST_NAME = "manifest.json"
MODEL_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
REPORT_NAME = "report.json"
ENGINE_NAME = "model.engine"
BUILD_NAME = "build.json"
