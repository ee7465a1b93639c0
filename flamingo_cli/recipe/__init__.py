"""Training recipes: typed TOML documents, their validation rules and the derived plan."""
