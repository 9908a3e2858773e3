"""The trainable nn modules: the independent draft model, Medusa and EAGLE heads, the discriminator; and the draft
vocabulary saved beside a drafter. Training (koala.training) fits them; the engine (koala.engine) drafts with them."""
