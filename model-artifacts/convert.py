"""CLI entry point of the lambda-llm model converter (GGUF -> ONNX artifact); see lambda_llm_convert/."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lambda_llm_convert.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
