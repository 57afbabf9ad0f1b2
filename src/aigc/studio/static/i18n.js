// The studio's words in English and Chinese (简体中文). t(key, {name: value}) fills {name} placeholders.
"use strict";
const WORDS = {
  en: {
    "skip": "Skip to content", "language": "Language", "apikey": "API key",
    "needkey": "This server needs an API key: paste one at the top right (aigc keys create NAME makes one).",
    "nav.models": "Models", "nav.generate": "Generate", "nav.history": "History", "nav.arena": "Arena",
    "nav.train": "Train", "nav.compare": "Compare",
    "all": "all", "loading": "working…", "model": "Model", "copy": "Copy", "copied": "Copied",
    "modality.text": "text", "modality.image": "image", "modality.series": "series",
    "status.running": "running", "status.done": "done", "status.failed": "failed", "status.interrupted": "stopped",
    "models.none": "No finished runs yet. Train one in Train (a text n-gram takes seconds).",
    "models.noscore": "not scored yet", "models.use": "Generate with it", "models.report": "Report",
    "models.baseline": "baseline: n-gram {run}, {value} bits/char",
    "curve.step": "step", "curve.loss": "loss", "curve.legend": "solid: training loss · dashed: validation loss",
    "image.alt": "generated image {i}",
    "rate.up": "Good", "rate.down": "Bad", "rate.comment": "comment (optional)", "rate.saved": "Thanks, rating saved",
    "gen.prompt": "Prompt", "gen.prompthelp": "The text the model continues (empty: a new text).",
    "gen.class": "Class", "gen.advanced": "Advanced settings", "gen.go": "Generate", "gen.stop": "Stop",
    "gen.stopped": "Stopped.", "gen.seedhelp": "Same seed and settings, same result (empty: a new seed).",
    "gen.seedwas": "seed {seed}",
    "opt.max_tokens": "Length (tokens)", "opt.temperature": "Temperature", "opt.n": "How many",
    "opt.top_k": "Top-k", "opt.top_p": "Top-p", "opt.min_p": "Min-p", "opt.repetition_penalty": "Repetition penalty",
    "opt.num_beams": "Beams", "opt.no_repeat_ngram_size": "No repeated n-grams of size", "opt.sampler": "Sampler",
    "opt.steps": "Steps", "opt.eta": "Eta", "opt.guidance_scale": "Guidance", "opt.truncation": "Truncation",
    "opt.horizon": "Horizon (steps ahead)", "opt.level": "Interval level", "opt.paths": "Sample paths",
    "opt.noise": "Noise", "opt.seed": "Seed",
    "hist.search": "Search prompts", "hist.modality": "Kind", "hist.rating": "Rating",
    "hist.rated": "rated", "hist.unrated": "not rated", "hist.find": "Find", "hist.count": "{n} found",
    "hist.when": "When", "hist.source": "From", "hist.what": "What", "hist.again": "Make it again",
    "hist.regenerate": "Regenerate exactly", "hist.same": "Same as the stored result",
    "hist.differs": "Differs from the stored result", "hist.cli": "As a command:", "hist.curl": "As an API call:",
    "hist.download": "Download (JSON)", "hist.record": "Full record",
    "arena.intro": "Two anonymous models answer the same prompt. Pick the better one; their names are shown after you vote.",
    "arena.prompt": "Prompt or class", "arena.prompthelp": "Text: what both continue. Image: the class both draw (empty for unconditional runs).",
    "arena.go": "New battle", "arena.left": "Model A", "arena.right": "Model B", "arena.tie": "Tie",
    "arena.both_bad": "Both bad", "arena.was": "This was {run} ({family})", "arena.board": "Leaderboard",
    "arena.novotes": "No votes yet.", "arena.rank": "Rank", "arena.rating": "Rating", "arena.ci": "95% interval",
    "arena.votes": "Votes", "arena.metric": "Automatic metric",
    "arena.explain": "Bradley-Terry ratings on the Elo scale from {n} votes: 400 points apart = the better one wins 10 times in 11. Intervals: 95% bootstrap.",
    "train.kind": "Kind of data", "train.file": "Your file", "train.filehelp": "text: .txt / .jsonl; image: a .zip of images; series: a .csv",
    "train.upload": "Upload", "train.nofile": "Choose a file first.", "train.uploaded": "{name} uploaded",
    "train.data": "Data", "train.yours": "yours", "train.missing": "not installed: apt-get install {pkg}",
    "train.family": "Model family", "train.preset": "Time", "train.quick": "quick (2 min)", "train.good": "good (10 min)",
    "train.custom": "custom", "train.minutes": "Minutes", "train.name": "Run name",
    "train.namehelp": "letters, digits, . _ - (empty: a name is made)", "train.conditional": "Class-conditional",
    "train.start": "Start training", "train.jobs": "Jobs", "train.nojobs": "No jobs yet.", "train.progress": "progress",
    "train.eta": "about", "train.stop": "Stop (keeps the checkpoint)", "train.evaluate": "Evaluate",
    "train.trainjob": "Training", "train.evaljob": "Evaluation",
    "compare.intro": "Two to four runs side by side: their metrics, loss curves and samples.",
    "compare.pick": "Runs", "compare.go": "Compare", "compare.count": "Pick two to four runs.",
    "compare.metric": "Metric", "compare.curves": "Loss curves", "compare.samples": "Samples (seed 0)",
    "compare.split": "Metrics are each run's own, on its validation split: runs on the same data are comparable.",
  },
  zh: {
    "skip": "跳到正文", "language": "语言", "apikey": "API 密钥",
    "needkey": "此服务器需要 API 密钥：请粘贴到右上角（aigc keys create 名称 可以创建）。",
    "nav.models": "模型", "nav.generate": "生成", "nav.history": "历史", "nav.arena": "竞技场",
    "nav.train": "训练", "nav.compare": "比较",
    "all": "全部", "loading": "处理中…", "model": "模型", "copy": "复制", "copied": "已复制",
    "modality.text": "文本", "modality.image": "图像", "modality.series": "时间序列",
    "status.running": "运行中", "status.done": "完成", "status.failed": "失败", "status.interrupted": "已停止",
    "models.none": "还没有训练好的模型。去“训练”页训练一个（文本 n-gram 只需几秒）。",
    "models.noscore": "尚未评分", "models.use": "用它生成", "models.report": "报告",
    "models.baseline": "基线：n-gram {run}，{value} 比特/字",
    "curve.step": "步", "curve.loss": "损失", "curve.legend": "实线：训练损失 · 虚线：验证损失",
    "image.alt": "生成的图像 {i}",
    "rate.up": "好", "rate.down": "差", "rate.comment": "评论（可选）", "rate.saved": "谢谢，评分已保存",
    "gen.prompt": "提示词", "gen.prompthelp": "模型接着写的文字（留空：写一段新的）。",
    "gen.class": "类别", "gen.advanced": "高级设置", "gen.go": "生成", "gen.stop": "停止",
    "gen.stopped": "已停止。", "gen.seedhelp": "相同的种子和设置得到相同的结果（留空：新种子）。",
    "gen.seedwas": "种子 {seed}",
    "opt.max_tokens": "长度（词元）", "opt.temperature": "温度", "opt.n": "数量",
    "opt.top_k": "Top-k", "opt.top_p": "Top-p", "opt.min_p": "Min-p", "opt.repetition_penalty": "重复惩罚",
    "opt.num_beams": "束宽", "opt.no_repeat_ngram_size": "禁止重复的 n-gram 长度", "opt.sampler": "采样器",
    "opt.steps": "步数", "opt.eta": "Eta", "opt.guidance_scale": "引导强度", "opt.truncation": "截断",
    "opt.horizon": "预测步数", "opt.level": "区间水平", "opt.paths": "样本路径数",
    "opt.noise": "噪声", "opt.seed": "随机种子",
    "hist.search": "搜索提示词", "hist.modality": "类型", "hist.rating": "评分",
    "hist.rated": "已评分", "hist.unrated": "未评分", "hist.find": "查找", "hist.count": "找到 {n} 条",
    "hist.when": "时间", "hist.source": "来源", "hist.what": "内容", "hist.again": "重新生成",
    "hist.regenerate": "完全重现", "hist.same": "与保存的结果相同",
    "hist.differs": "与保存的结果不同", "hist.cli": "命令行：", "hist.curl": "API 调用：",
    "hist.download": "下载（JSON）", "hist.record": "完整记录",
    "arena.intro": "两个匿名模型回答同一个提示词。选出更好的那个；投票后显示它们的名字。",
    "arena.prompt": "提示词或类别", "arena.prompthelp": "文本：两者接着写的文字。图像：两者都画的类别（无条件模型留空）。",
    "arena.go": "新的对战", "arena.left": "模型 A", "arena.right": "模型 B", "arena.tie": "平局",
    "arena.both_bad": "都不好", "arena.was": "这是 {run}（{family}）", "arena.board": "排行榜",
    "arena.novotes": "还没有投票。", "arena.rank": "名次", "arena.rating": "评分", "arena.ci": "95% 区间",
    "arena.votes": "票数", "arena.metric": "自动指标",
    "arena.explain": "根据 {n} 票计算的 Bradley-Terry 评分（Elo 刻度）：相差 400 分表示强者 11 次中赢 10 次。区间：95% 自助法。",
    "train.kind": "数据类型", "train.file": "你的文件", "train.filehelp": "文本：.txt / .jsonl；图像：图片的 .zip；时间序列：.csv",
    "train.upload": "上传", "train.nofile": "请先选择文件。", "train.uploaded": "{name} 已上传",
    "train.data": "数据", "train.yours": "你的", "train.missing": "未安装：apt-get install {pkg}",
    "train.family": "模型族", "train.preset": "时间", "train.quick": "快速（2 分钟）", "train.good": "较好（10 分钟）",
    "train.custom": "自定义", "train.minutes": "分钟", "train.name": "运行名称",
    "train.namehelp": "字母、数字、. _ -（留空：自动命名）", "train.conditional": "按类别条件生成",
    "train.start": "开始训练", "train.jobs": "任务", "train.nojobs": "还没有任务。", "train.progress": "进度",
    "train.eta": "约", "train.stop": "停止（保留检查点）", "train.evaluate": "评估",
    "train.trainjob": "训练", "train.evaljob": "评估",
    "compare.intro": "并排比较两到四个运行：指标、损失曲线和样本。",
    "compare.pick": "运行", "compare.go": "比较", "compare.count": "请选择两到四个运行。",
    "compare.metric": "指标", "compare.curves": "损失曲线", "compare.samples": "样本（种子 0）",
    "compare.split": "指标是各运行在自己验证集上的结果：同一数据上的运行可以比较。",
  },
};

function currentLanguage() {
  const saved = localStorage.getItem("aigc.lang");
  if (saved && WORDS[saved]) return saved;
  return (navigator.language || "en").toLowerCase().startsWith("zh") ? "zh" : "en";
}

let LANG = currentLanguage();

function t(key, vars = {}) {
  const text = WORDS[LANG][key] ?? WORDS.en[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (_, name) => (name in vars ? vars[name] : `{${name}}`));
}

function setLanguage(lang) {
  LANG = WORDS[lang] ? lang : "en";
  localStorage.setItem("aigc.lang", LANG);
  document.documentElement.lang = LANG === "zh" ? "zh-CN" : "en";
  document.querySelectorAll("[data-i18n]").forEach(el => { el.textContent = t(el.dataset.i18n); });
}
