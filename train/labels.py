"""Display names of the models in tables, reports and figures (the library's models know only
their kinds: ``"open"``, ``"vae"``, ...)."""

#: the flow models of the toy and image-classification runs, by kind
FLOW_LABELS = {"node": "NODE", "anode": "ANODE", "anode_matched": "ANODE (open's parameters)",
               "open": "N-CODE open", "closed": "N-CODE closed"}

#: the autoencoders, by kind
AUTOENCODER_LABELS = {"ae": "AE", "vae": "VAE", "ncode": "AutoN-CODE"}
