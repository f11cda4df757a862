"""``LabeledData`` for the data layer's modules; the type itself lives in the foundation layer
(:mod:`unlearn_kernels.labeled`), where every layer can import it."""
from ..labeled import LabeledData

__all__ = ["LabeledData"]
