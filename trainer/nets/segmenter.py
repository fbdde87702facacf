"""The segmentation U-Net (DRAEM-style discriminative network) on [x, x̂0] → anomaly map."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _conv_bn_relu(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]


def _double_conv(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(*_conv_bn_relu(in_ch, out_ch), *_conv_bn_relu(out_ch, out_ch))


class Segmenter(nn.Module):
    """Encoder of double conv blocks with max-pool; bilinear-upsampling decoder with skips.

    ``channels`` are the encoder widths, one per level (reference: 64,128,256,512,512,512).
    The decoder stage fed by encoder level j outputs ``channels[max(j-1, 0)]`` channels.
    """

    def __init__(self, channels: tuple[int, ...], in_channels: int):
        super().__init__()
        self.encoder = nn.ModuleList(
            _double_conv(in_channels if j == 0 else channels[j - 1], c) for j, c in enumerate(channels)
        )
        self.up_convs = nn.ModuleList()
        self.decoder = nn.ModuleList()
        ch = channels[-1]
        for j in range(len(channels) - 2, -1, -1):
            out = channels[max(j - 1, 0)]
            self.up_convs.append(nn.Sequential(*_conv_bn_relu(ch, out)))
            self.decoder.append(_double_conv(out + channels[j], out))
            ch = out
        self.head = nn.Conv2d(ch, 1, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """[B, 2C, H, W] (image and reconstruction) → anomaly probability [B, 1, H, W] (H, W divisible by 2^(levels-1))."""
        return torch.sigmoid(self.logits(x))

    def logits(self, x: Tensor) -> Tensor:
        skips = []
        for j, block in enumerate(self.encoder):
            x = block(x if j == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up_conv, block in zip(self.up_convs, self.decoder):
            x = up_conv(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))
            x = block(torch.cat([x, skips.pop()], dim=1))
        return self.head(x)
