"""Publishing a trained model: the model card (`cards`), its pictures (`plots`), the run's report in the output
folder (`run_report`) and the upload of a complete Hub bundle (`push`)."""
