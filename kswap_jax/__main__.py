from kswap_jax.cli import main

main()
