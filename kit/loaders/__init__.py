"""What is loaded: the offline assets (embedded model, texts, questions), the data sets (texts, MMLU,
BoolQ, recall items), and models (`load_model`)."""

from ..core.lazy import lazy as _lazy

__getattr__, __dir__ = _lazy(__name__, ["assets", "data", "models"])
