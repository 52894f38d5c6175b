"""The committed episode lists (installed as ``fewshot_nsl.episodes``); see README.md here."""
