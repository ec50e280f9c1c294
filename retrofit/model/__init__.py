"""The recurrent model: its configuration and modeling files (self-contained, copied beside saved
weights), the conversion of pretrained decoders into it, and the choice of which layers recur."""
