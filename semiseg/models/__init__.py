"""Segmentation networks: timm encoders with DeepLabV3+, SegFormer or DPT (plain ViT) heads, and
the medical UNet (``model.encoder: unet``, ``model.head: unet``)."""

from semiseg.models.encoder import create_encoder, load_encoder_weights
from semiseg.models.heads import DeepLabV3PlusHead, DPTHead, SegFormerHead
from semiseg.models.segmodel import SegModel, build_model, check_input_size
from semiseg.models.unet import UNetDecoder, UNetEncoder  # registers the "unet" head

__all__ = ["SegModel", "build_model", "check_input_size", "create_encoder", "load_encoder_weights",
           "DeepLabV3PlusHead", "DPTHead", "SegFormerHead", "UNetEncoder", "UNetDecoder"]
