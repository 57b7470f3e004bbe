"""`medfed predict`: apply a trained model at the site and write what a PACS and a reader use.

Everything here runs inside the hospital and sends nothing anywhere: predictions, DICOM SEG and
Secondary Capture objects, saliency and probability maps stay in the output folder.
"""
