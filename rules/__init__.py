"""The built-in rules, one identity per file; each names its phase (reparam.core.rule.PHASES).

The engine keeps each phase at its fixpoint before a later one acts: canonicalize (drop identities, flatten
sums, absorb explicit pads), fold (an affine into the conv before it), normalize (parallel branches of one
input brought to a common form: identity/avg-pool/chain → conv, common dilation and grouping), merge
(parallel branches), serial (chains), and forward-fold (an affine into the conv or Linear after it, which
must not pre-empt the backward folds). Within a phase, rules are tried in this list's order at each node.
"""
from reparam.rules.affine_before_flatten import affine_before_flatten
from reparam.rules.affine_merge import affine_merge
from reparam.rules.affine_through_layout import affine_through_layout
from reparam.rules.affine_through_pool import affine_through_pool
from reparam.rules.affine_through_reshape import affine_through_reshape
from reparam.rules.avgpool_to_conv import avgpool_to_conv
from reparam.rules.bn_prefold import bn_prefold
from reparam.rules.concat_affine_split import concat_affine_split
from reparam.rules.const_pad_commute import const_pad_commute
from reparam.rules.conv_bn_fold import conv_bn_fold
from reparam.rules.conv_to_dense import conv_to_dense
from reparam.rules.conv_transpose_bn_fold import conv_transpose_bn_fold
from reparam.rules.crop_as_pad import crop_as_pad
from reparam.rules.dilated_to_dense import dilated_to_dense
from reparam.rules.groups_merge import groups_merge
from reparam.rules.identity_elim import identity_elim
from reparam.rules.identity_to_conv import identity_to_conv
from reparam.rules.linear_sum import linear_sum
from reparam.rules.pad_fold import pad_fold
from reparam.rules.parallel_conv_transpose import parallel_conv_transpose
from reparam.rules.parallel_sum_pad import parallel_sum_pad
from reparam.rules.scale_fold import scale_fold
from reparam.rules.serial_into_sibling import serial_into_sibling
from reparam.rules.serial_merge import serial_merge
from reparam.rules.sum_flatten import sum_flatten

DEFAULT_RULES = [
    identity_elim,
    sum_flatten,
    pad_fold,
    conv_bn_fold,
    conv_transpose_bn_fold,
    const_pad_commute,
    affine_before_flatten,
    affine_through_layout,
    affine_through_reshape,
    affine_merge,
    concat_affine_split,
    scale_fold,
    identity_to_conv,
    crop_as_pad,
    avgpool_to_conv,
    dilated_to_dense,
    groups_merge,
    serial_into_sibling,
    parallel_sum_pad,
    parallel_conv_transpose,
    linear_sum,
    conv_to_dense,
    serial_merge,
    bn_prefold,
    affine_through_pool,
]

__all__ = [r.name for r in DEFAULT_RULES] + ["DEFAULT_RULES"]
