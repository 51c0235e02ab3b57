"""lambda_llm_convert: converts a Llama-architecture GGUF into the lambda-llm ONNX model artifact."""

CONVERTER_VERSION = "0.1.0"
ORT_VERSION = "1.31.1"
ONNX_IR_VERSION = 10  # ORT 1.31 rejects IR > 13; onnx 1.23 would write 14 by default
DEFAULT_MODEL_ID = "smollm2-135m-instruct"


class ConversionError(Exception):
    """An input the converter refuses; the CLI prints it on one line and exits with code 2."""
