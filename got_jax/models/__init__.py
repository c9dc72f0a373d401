"""Model families: Qwen2.5-VL (reasoner) and SDXL (UNet, VAE)."""
