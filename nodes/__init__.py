"""Node classes: inputs, validation, and one call into the engine. Registered in ../__init__.py."""
from .robust import (BarycenterGeometricMedian, BarycenterGeometricMedianCLIP, BarycenterKarcherMean,
                     BarycenterKarcherMeanCLIP, BarycenterSignElectedMedian)
from .ot_fusion import BarycenterOTFusion, BarycenterOTFusionCLIP
from .report import BarycenterMergeReport
from .weighted_mean import BarycenterWeightedMean, BarycenterWeightedMeanCLIP

_NODES = [
    (BarycenterWeightedMean, "Weighted Mean Merge"),
    (BarycenterWeightedMeanCLIP, "Weighted Mean Merge (CLIP)"),
    (BarycenterGeometricMedian, "Geometric Median Merge"),
    (BarycenterGeometricMedianCLIP, "Geometric Median Merge (CLIP)"),
    (BarycenterKarcherMean, "Karcher Mean Merge"),
    (BarycenterKarcherMeanCLIP, "Karcher Mean Merge (CLIP)"),
    (BarycenterSignElectedMedian, "Sign-Elected Median Merge"),
    (BarycenterOTFusion, "OT Fusion Merge"),
    (BarycenterOTFusionCLIP, "OT Fusion Merge (CLIP)"),
    (BarycenterMergeReport, "Merge Report"),
]
NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls, _ in _NODES}
NODE_DISPLAY_NAME_MAPPINGS = {cls.__name__: name for cls, name in _NODES}
