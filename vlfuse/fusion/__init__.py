from vlfuse.fusion.heads import FUSION_HEADS, FusionOutput, TowerShape, build_fusion

__all__ = ["FUSION_HEADS", "FusionOutput", "TowerShape", "build_fusion"]
