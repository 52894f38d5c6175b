import pytest
import torch
from torch import nn

from fewshot_nsl.registry import create_backbone, list_backbones
from fewshot_nsl.errors import ConfigError, RegistryError


def test_cnn4_shapes_follow_the_paper():
    net = create_backbone("cnn4")  # 32 filters, as in the paper
    assert net.forward_map(torch.zeros(2, 3, 84, 84)).shape == (2, 32, 5, 5)
    assert net.feature_dim(84) == 800
    assert create_backbone("cnn4", filters=64).feature_dim(84) == 1600


def test_cnn9_follows_the_authors_layout():
    # nsl_image_recog/experiments_cifar10/dynamic_dns/architecture.py: plain root conv 32, stages 32/64/128 of
    # three convs each ending in a 'SAME' 2x2 max-pool, BN eps 1e-3, score layer = the head on the flat map.
    net = create_backbone("cnn9")
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    pools = [m for m in net.modules() if isinstance(m, nn.MaxPool2d)]
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 10 and len(pools) == 3 and all(p.ceil_mode for p in pools)
    assert [c.out_channels for c in convs] == [32] + [32] * 3 + [64] * 3 + [128] * 3
    assert all(bn.eps == 1e-3 for bn in bns)
    assert net.forward_map(torch.zeros(1, 3, 84, 84)).shape == (1, 128, 11, 11)
    assert net.feature_dim(84) == 128 * 11 * 11
    old = create_backbone("cnn9", stem=64, widths=[64, 128, 256], global_pool=True, ceil_pool=False)
    assert old.feature_dim(84) == 256 and old.forward_map(torch.zeros(1, 3, 84, 84)).shape == (1, 256, 1, 1)


def test_cnn9_stem_is_plain_unless_nsl_stem():
    made = []

    def factory(cin, cout, k, stride=1, padding=0, bias=True):
        made.append(cin)
        return nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=bias)

    create_backbone("cnn9", conv_layer=factory)
    assert len(made) == 9 and 3 not in made  # the root conv (3 input channels) is a plain nn.Conv2d
    made.clear()
    create_backbone("cnn9", conv_layer=factory, nsl_stem=True)
    assert len(made) == 10 and made[0] == 3


def test_cnn4_sung_encoder_and_per_block_options():
    net = create_backbone("cnn4", filters=64, pool=[True, True, False, False], padding=[0, 0, 1, 1])
    assert net.forward_map(torch.zeros(2, 3, 84, 84)).shape == (2, 64, 19, 19)  # Sung et al.'s 64x19x19
    assert len([m for m in net.modules() if isinstance(m, nn.MaxPool2d)]) == 2
    assert create_backbone("cnn4", pool=False).forward_map(torch.zeros(1, 3, 20, 20)).shape == (1, 32, 20, 20)
    with pytest.raises(ConfigError, match="pool needs 4 values"):
        create_backbone("cnn4", pool=[True, False])


@pytest.mark.parametrize("name", list_backbones())
def test_backbone_uses_the_conv_factory_and_every_parameter_learns(name):
    made = []

    def factory(cin, cout, k, stride=1, padding=0, bias=True):
        conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=bias)
        made.append(conv)
        return conv

    net = create_backbone(name, conv_layer=factory)
    assert made and all(any(m is c for m in net.modules()) for c in made)
    out = net(torch.randn(4, 3, 32, 32))
    assert torch.isfinite(out).all()
    out.pow(2).mean().backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_unknown_backbone_option_lists_accepted():
    with pytest.raises(RegistryError, match="accepted: bn_eps, conv_layer, filters"):
        create_backbone("cnn4", filterz=3)
    with pytest.raises(RegistryError, match="unknown backbone 'resnet'"):
        create_backbone("resnet")
