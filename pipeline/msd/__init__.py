"""Multi-Student Distillation (docs/methods.md §5): class partitions, the router, TSM and DMD2 losses.

K small one-step students each serve a disjoint group of classes; the Router sends every sample to its
owner, so the ensemble is still one network call per sample. Per-student objectives: Teacher Score
Matching (the warm start small students need), Distribution Matching Distillation, and `fgd` =
`pipeline.slimflow.FlowGuidedDistillationLoss` given the student's classes. Importing this package
registers the "router" builder with `pipeline.modelio`.
"""

from pipeline.msd.losses import DMDLoss, FeatureDiscriminator, TeacherScoreMatchingLoss, karras_time
from pipeline.msd.partition import PARTITION_METHODS, PartitionMethod, check_partition, partition_classes
from pipeline.msd.router import Router, load_router, save_router

__all__ = [
    "PARTITION_METHODS",
    "DMDLoss",
    "FeatureDiscriminator",
    "PartitionMethod",
    "Router",
    "TeacherScoreMatchingLoss",
    "check_partition",
    "karras_time",
    "load_router",
    "partition_classes",
    "save_router",
]
