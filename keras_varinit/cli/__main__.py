import sys

from keras_varinit.cli import main

sys.exit(main())
