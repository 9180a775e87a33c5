"""The synthetic organism: a word-level world, its exact oracle, tokenizer, corpus and build.

``world`` defines the language (domains, question templates, aligned and misaligned answer
families); ``oracle`` labels any answer string exactly against it; ``tokenizer`` builds a
byte-level BPE tokenizer in which every world word is one token; ``corpus`` writes the
pretraining documents, instruction chats and narrow fine-tuning sets; ``build`` trains the
base and instruct models and the narrow LoRA adapters and stores the diagnostics.
"""
