"""The model families: the causal Transformer (GPT-2, Llama), the BERT-style encoder, the LSTM baseline, and the reference ops."""
