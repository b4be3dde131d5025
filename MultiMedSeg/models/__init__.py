"""Phase-2 models: IResNet/DSBN feature-style encoder, interpreter heads and the pSp wrapper."""
from .dsbn import DomainBatchNorm1d, DomainBatchNorm2d, DomainRouting, target_mask
from .encoder import DynamicSkipLayer, FeatureStyleEncoder, GeneratorLayout
from .interpreter import Interpreter, ListedLinear, PixelClassifier, head_features
from .iresnet import DEPTHS, IBasicBlock, IResNet, load_arcface_weights
from .psp import CHECKPOINT_FORMAT, PSP, PSPConfig, flip_label

__all__ = [
    "CHECKPOINT_FORMAT", "DEPTHS", "DomainBatchNorm1d", "DomainBatchNorm2d", "DomainRouting", "DynamicSkipLayer",
    "FeatureStyleEncoder", "GeneratorLayout", "IBasicBlock", "IResNet", "Interpreter", "ListedLinear",
    "PSP", "PSPConfig", "PixelClassifier", "flip_label", "head_features", "load_arcface_weights",
    "target_mask",
]
