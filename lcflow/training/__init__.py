"""Training adapters; the base models stay frozen.

- train.py: the Trainer for LCF and slot LCF-X adapters (answer cross-entropy), checkpointed.
- config.py: TrainConfig, what one run is asked to do.
- own_answers.py: open prompts learn the receiver's own answer reading the document.
- distill.py: task training of span adapters from the alignment (answer CE + KL to the text).
- lcfx_recipe.py: `lcflow train --mode lcfx`: alignment, head choice, distillation in one command.
- reader.py: text readers (LoRA on the receiver) trained on LCF-X's budget.
- c2c.py: the C2C baseline's fuser.
- bridge_fit.py: a bridge adapter's translator, fitted on corpus documents.
- corpus.py: the seeded text corpus alignments and bridges are fitted on.
- heads.py: the sharer's retrieval heads, ranked on training samples.
- narrow.py: a compressed span adapter narrowed from a full-width one in closed form.
"""
