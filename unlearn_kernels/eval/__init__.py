"""Evaluation of unlearning: accuracy, membership inference (three named conventions),
divergences to the oracle (KL, JS, the LoTUS-compatible JS, RF-JSD), Avg Gap, tug-of-war, weight
and activation distances, the Newton residual, and cost (time, peak memory, speed-up)."""
from .cost import Measured, PeakMemory, measure, speedup
from .metrics import (
    AVG_GAP_KEYS,
    TOW_KEYS,
    accuracy,
    activation_distance,
    avg_gap,
    gradient_norm,
    js_divergence,
    js_divergence_lotus,
    kl_divergence,
    predict_logits,
    rf_jsd,
    tug_of_war,
    weight_distance,
)
from .mia import mia_entropy, mia_loss, mia_salun_efficacy

__all__ = [
    "AVG_GAP_KEYS",
    "TOW_KEYS",
    "Measured",
    "accuracy",
    "activation_distance",
    "avg_gap",
    "gradient_norm",
    "js_divergence",
    "js_divergence_lotus",
    "kl_divergence",
    "PeakMemory",
    "measure",
    "mia_entropy",
    "mia_loss",
    "mia_salun_efficacy",
    "predict_logits",
    "rf_jsd",
    "speedup",
    "tug_of_war",
    "weight_distance",
]
