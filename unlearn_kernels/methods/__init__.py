"""Unlearning methods behind one interface, :class:`Unlearner`."""
from .adapters import CureNewtonLoRA
from .base import Unlearner, UnlearnResult
from .first_order import SCRUB, SSD, UNSIR, BadTeacher, Finetune, GradientAscent, NegGradPlus, RandomLabels, SalUn
from .lotus import LoTUS
from .newton import (
    CureNewton,
    DampedNewton,
    DampedNewtonCG,
    InfluenceNewton,
    LiSSANewton,
    NewtonPinv,
    StochasticCureNewton,
)
from .reference import Original, Retrain, RetrainReseeded
from .rfa import RFA

#: every method by its ``name``
METHODS: dict[str, type[Unlearner]] = {
    method.name: method
    for method in (Retrain, RetrainReseeded, Original, Finetune, GradientAscent, NegGradPlus, RandomLabels, SalUn,
                   SCRUB, BadTeacher, SSD, UNSIR, LoTUS, RFA, CureNewton, CureNewtonLoRA, StochasticCureNewton,
                   NewtonPinv, DampedNewton, DampedNewtonCG, InfluenceNewton, LiSSANewton)
}

__all__ = ["METHODS", "RFA", "SCRUB", "SSD", "UNSIR", "BadTeacher", "CureNewton", "CureNewtonLoRA", "DampedNewton",
           "DampedNewtonCG", "Finetune", "GradientAscent", "InfluenceNewton", "LiSSANewton", "LoTUS", "NegGradPlus",
           "NewtonPinv", "Original", "RandomLabels", "Retrain", "RetrainReseeded", "SalUn", "StochasticCureNewton",
           "UnlearnResult", "Unlearner"]
