"""The segmentation model: a small fully convolutional UNet, its training and export."""
