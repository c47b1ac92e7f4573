import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxretrieval.backbones import mobilenet_v2
from jaxretrieval.local_features import (
    LayerGeometry,
    ReceptiveField,
    backbone_receptive_field,
    feature_centers,
    layer_stack,
    receptive_field,
)


def test_receptive_field_known_values():
    # By hand: r += (k - 1) j, o += ((k - 1) / 2 - p) j, j *= s.
    assert receptive_field([]) == ReceptiveField(1, 1, 0.0)
    # 3x3/2 pad 1 then 3x3/1 pad 1: r = 1 + 2 + 2*2 = 7, j = 2, o = 0.
    assert receptive_field([LayerGeometry(3, 2, 1), LayerGeometry(3, 1, 1)]) == (7, 2, 0.0)
    # Unpadded 3x3: the first centre is pixel 1; then a 2x2/2 pool: o = 1 + 0.5 = 1.5.
    assert receptive_field([LayerGeometry(3), LayerGeometry(2, 2)]) == (4, 2, 1.5)
    # Dilation 2 acts as a 5x5 kernel; padding 2 keeps the centre.
    assert receptive_field([LayerGeometry(3, 1, 2, 2)]) == (5, 1, 0.0)
    # 7x7/2 pad 3 (ResNet stem) then 3x3/2 pad 1 (max-pool): r = 7 + 2*2 = 11, j = 4.
    assert receptive_field([LayerGeometry(7, 2, 3), LayerGeometry(3, 2, 1)]) == (11, 4, 0.0)


@pytest.mark.parametrize(
    "backbone, name, expected",
    [
        # MobileNetV2, by hand: stem 3 (j 2); each depthwise 3x3 adds 2 j:
        # block1 7; block2 (s2) 11, j 4; block3 19 = stage1; block4 (s2) 27, j 8;
        # blocks 5-6 59 = stage2; block7 (s2) 75, j 16; blocks 8-13 267 = stage3;
        # block14 (s2) 299, j 32; blocks 15-17 491 = stage4. Symmetric padding: o = 0.
        ("mobilenet_v2", "stage1", (19, 4, 0.0)),
        ("mobilenet_v2", "stage2", (59, 8, 0.0)),
        ("mobilenet_v2", "stage3", (267, 16, 0.0)),
        ("mobilenet_v2", "stage4", (491, 32, 0.0)),
        ("mobilenet_v2", "last_conv", (491, 32, 0.0)),
        # VGG16: 3x3 convs add 2 j; each 2x2 pool adds j and shifts o by j / 2:
        # 5, pool 6 (j 2, o .5); 14, pool 16 (j 4, o 1.5); 40, pool 44 (j 8, o 3.5);
        # 92 = conv4_3, pool 100 (j 16, o 7.5); 196 = conv5_3.
        ("vgg16", "conv1_2", (5, 1, 0.0)),
        ("vgg16", "conv4_3", (92, 8, 3.5)),
        ("vgg16", "conv5_3", (196, 16, 7.5)),
        ("vgg16", "pool5", (212, 32, 15.5)),
        # torchvision ResNet50: stem+pool 11 (j 4); layer1 3 x 2*4 -> 35; layer2 first
        # (s2) 43, j 8, +3*16 -> 91; layer3 first (s2) 107, j 16, +5*32 -> 267 (conv4).
        ("resnet50", "stage3", (267, 16, 0.0)),
        ("resnet50", "stage4", (267 + 32 + 2 * 64, 32, 0.0)),
        # ResNet101, dilated last stage: layer3 first (s2) 107, j 16, +22*32 -> 811;
        # layer4 first 3x3 (d 1, s 1) +32 -> 843; two with dilation 2 (5x5) +64 each.
        ("resnet101_dilated", "stage4", (971, 16, 0.0)),
    ],
)
def test_backbone_receptive_field_known_values(backbone, name, expected):
    assert backbone_receptive_field(backbone, name) == expected


def test_layer_stack_names_the_last_layer_it_depends_on():
    assert layer_stack("mobilenet_v2", "stage3")[-1].module == "block13"
    assert layer_stack("vgg16", "conv5_3")[-1].module == "conv5_3"
    assert layer_stack("resnet50", "stage3")[-1].module == "layer3_5"


def test_layer_stack_raises():
    with pytest.raises(ValueError, match="no receptive-field geometry.*supported: mobilenet_v2"):
        layer_stack("efficientnet_lite0", "last_conv")
    with pytest.raises(ValueError, match="no feature map 'stage9'"):
        layer_stack("mobilenet_v2", "stage9")
    with pytest.raises(ValueError, match="invalid layer geometry"):
        receptive_field([LayerGeometry(0)])


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (3, 2)])
def test_feature_centers_shapes_and_values(shape):
    centers = feature_centers(ReceptiveField(19, 4, 1.5), shape)
    assert centers.shape == (*shape, 2) and centers.dtype == jnp.float32
    i, j = shape[0] - 1, shape[1] - 1
    np.testing.assert_array_equal(centers[i, j], [1.5 + 4 * j, 1.5 + 4 * i])  # (x, y)


def test_feature_centers_jit_matches_eager():
    field = backbone_receptive_field("vgg16", "conv5_3")
    jitted = jax.jit(feature_centers, static_argnums=(0, 1))(field, (3, 4))
    np.testing.assert_array_equal(jitted, feature_centers(field, (3, 4)))


def test_mobilenet_v2_stage1_gradient_support_is_the_receptive_field():
    """Empirical check on the real module: the input pixels a cell depends on.

    With every kernel positive, BatchNorm as identity plus a bias of 1 (so every ReLU6
    works in its linear range) and a positive input, no gradient cancels or is clipped:
    the support of d cell / d image is the receptive field clipped to the image.
    """
    module = mobilenet_v2.MobileNetV2()
    image = jnp.ones((1, 64, 64, 3), jnp.float32)
    shapes = jax.eval_shape(module.init, jax.random.key(0), image)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        value = {"'var'": 1.0, "'mean'": 0.0, "'bias'": 1.0, "'scale'": 1.0}.get(
            name.rsplit("[", 1)[-1].rstrip("]"), 0.01
        )
        return jnp.full(leaf.shape, value, leaf.dtype)

    variables = jax.tree_util.tree_map_with_path(fill, shapes)

    @jax.jit
    def support(image):
        def cell(x):
            return jnp.sum(module.apply(variables, x)[1]["stage1"][0, 8, 8])

        return jnp.abs(jax.grad(cell)(image))[0].sum(-1) > 0  # (64, 64)

    mask = np.asarray(support(image))
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    field = backbone_receptive_field("mobilenet_v2", "stage1")
    assert (rows.min(), rows.max()) == (32 - 9, 32 + 9)  # 19 pixels centred at 4 * 8
    assert (cols.min(), cols.max()) == (32 - 9, 32 + 9)
    center = feature_centers(field, (16, 16))[8, 8]
    np.testing.assert_array_equal(center, [(cols.min() + cols.max()) / 2] * 2)
    assert field.size == rows.max() - rows.min() + 1
