"""Node classes: inputs, validation, and one call into the engine. Registered in ../__init__.py."""
from .weighted_mean import BarycenterWeightedMean, BarycenterWeightedMeanCLIP

NODE_CLASS_MAPPINGS = {
    "BarycenterWeightedMean": BarycenterWeightedMean,
    "BarycenterWeightedMeanCLIP": BarycenterWeightedMeanCLIP,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "BarycenterWeightedMean": "Weighted Mean Merge",
    "BarycenterWeightedMeanCLIP": "Weighted Mean Merge (CLIP)",
}
