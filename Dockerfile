# Worker image. Weights are baked by builder/ (see README); this layout is the base the deploy issue fills in.
FROM python:3.11-slim
WORKDIR /app
COPY builder/requirements.txt builder/requirements.txt
RUN pip install --no-cache-dir -r builder/requirements.txt
COPY handler.py ./
COPY src/ src/
ENV MODELS_DIR=/models
CMD ["python", "-u", "handler.py"]
