"""emscope: a toolkit for emergent-misalignment research on HF causal LMs and PEFT LoRA adapters.

Importing the package is cheap: heavy libraries (torch, transformers, peft) are imported by the
modules that need them, so that ``emscope --help`` stays fast.
"""

__version__ = "0.1.0"

from emscope.errors import EmscopeError

__all__ = ["EmscopeError", "__version__"]
