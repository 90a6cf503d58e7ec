"""Alignment tuning: reward models, DPO and reinforcement learning (GRPO, RLOO).

Each method is an ``Objective`` that the one ``tinylm.train.Trainer`` trains with (the
same progress bar, metrics.jsonl, checkpoints that resume bit for bit, NaN stop), on a
base loaded and adapted as ``tinylm.finetune`` does (any source ``tinylm.loading``
reads, full weights or a PEFT adapter):

    preferences.py   preference pairs {prompt, chosen, rejected} (or chat messages)
    reward.py        a scalar head on a decoder, the Bradley-Terry loss
    dpo.py           DPO and its variants (sigmoid, IPO, hinge, robust)
    rl.py            rollouts, rewards, GRPO and RLOO
"""
