"""An example for `einfuse ir examples/custom_model.py:build`: any function returning
(model, example_args) can be captured."""
import torch


class TinyAttention(torch.nn.Module):
    """One causal self-attention head with a residual connection."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(width, 3 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return x + torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def build() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return TinyAttention().eval(), (torch.randn(1, 16, 32),)
