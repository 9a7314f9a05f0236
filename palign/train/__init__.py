"""Student SFT: the data side (`palign.train.data`: tokenising, loss masks, packing, loss)."""
